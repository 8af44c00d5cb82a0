"""The `p2pimg` command line: the parser, logging, and the exit code of each error."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence

from p2pimg import __version__
from p2pimg.cli import commands, helptext
from p2pimg.errors import P2pimgError
from p2pimg.fetch.policy import POLICIES


def _common(p: argparse.ArgumentParser, *, origin: bool = True) -> None:
    p.add_argument(
        "--home", metavar="DIR", help="state directory (default: $P2PIMG_HOME, else ~/.local/share/p2pimg)"
    )
    if origin:
        p.add_argument(
            "--origin",
            metavar="URL",
            help="origin URL (default: $P2PIMG_ORIGIN or file://$P2PIMG_HOME/origin)",
        )


def _trust(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust",
        action="append",
        metavar="PUBFILE",
        help="trust tags signed by this publisher key (repeatable; also $P2PIMG_HOME/trust/*.pub)",
    )


def _peers(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--peer",
        action="append",
        metavar="URL",
        help="a peer's address, e.g. http://10.0.0.5:5051 (repeatable)",
    )
    p.add_argument(
        "--swarm-key-file",
        metavar="PATH",
        help="the LAN's shared key (default: $P2PIMG_SWARM_KEY, else $P2PIMG_HOME/swarm.key)",
    )
    p.add_argument("--no-mdns", action="store_true", help="neither advertise nor browse with mDNS")
    p.add_argument(
        "--peer-tls-cert",
        metavar="PEM",
        help="this node's certificate for mutual TLS between "
        "peers (with --peer-tls-key and --peer-tls-ca; default: $P2PIMG_HOME/tls/peer.crt)",
    )
    p.add_argument(
        "--peer-tls-key", metavar="PEM", help="its private key (default: $P2PIMG_HOME/tls/peer.key)"
    )
    p.add_argument(
        "--peer-tls-ca",
        metavar="PEM",
        help="the swarm's CA: peers must present a certificate it signed (default: $P2PIMG_HOME/tls/ca.crt)",
    )


def _ipfs_gateway(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ipfs-gateway",
        action="append",
        metavar="URL",
        help="read images nerdctl pushed to IPFS (ipfs/<CID>) from this IPFS trustless gateway "
        "when the cache lacks them (repeatable; a server running on the home uses its own)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pimg",
        description=helptext.DESCRIPTION,
        epilog=helptext.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"p2pimg {__version__}", help="print the version and exit"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log more: informational messages, and publish's progress",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "publish",
        help="publish an image to the origin; prints its root CID",
        description=helptext.ABOUT["publish"],
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        nargs="?",
        help="oci:DIR[:TAG] (an OCI image layout; TAG may be left out when it holds one image; "
        "the layout's artifacts whose subject is one of the image's manifests come "
        "along), docker-archive:FILE[:NAME:TAG] (a `docker save` tarball; NAME:TAG picks "
        "one of several images) or docker://HOST/REPO:TAG (an image in a registry); "
        "left out with --attach",
    )
    p.add_argument("ref", metavar="NAME:TAG", help="the name and tag to publish it as, e.g. demo/app:1")
    p.add_argument(
        "--chunk-size",
        metavar="SIZE",
        help="chunk size, a power of two from 4K to 64M (default: $P2PIMG_CHUNK_SIZE, else "
        "config.toml's chunk_size, else 1M)",
    )
    p.add_argument(
        "--attach",
        action="append",
        metavar="FILE",
        help="instead of publishing an image, attach FILE (repeatable: one artifact, a layer "
        "per file) to the image NAME:TAG points at, as an OCI artifact whose subject is its "
        "top manifest (listed by the registry's referrers API); the tag moves to the new "
        "image root",
    )
    p.add_argument(
        "--artifact-type",
        metavar="TYPE",
        help="with --attach: the artifact's type, e.g. application/spdx+json or "
        "application/vnd.example.signature.v1 (required)",
    )
    p.add_argument(
        "--media-type",
        metavar="TYPE",
        help="with --attach: the media type of the files (default application/octet-stream)",
    )
    p.add_argument(
        "--annotation",
        action="append",
        metavar="KEY=VALUE",
        help="with --attach: an annotation of the artifact (repeatable; "
        "org.opencontainers.image.created is set to now unless given)",
    )
    _common(p)
    p.set_defaults(func=commands.cmd_publish)

    p = sub.add_parser(
        "keygen",
        help="make this home's ed25519 publisher key; prints the .pub path",
        description=helptext.ABOUT["keygen"],
    )
    _common(p, origin=False)
    p.set_defaults(func=commands.cmd_keygen)

    p = sub.add_parser(
        "resolve", help="print the root CID a NAME:TAG points at", description=helptext.ABOUT["resolve"]
    )
    _trust(p)
    p.add_argument("ref", metavar="NAME:TAG", help="a published image, e.g. demo/app:1")
    _common(p)
    p.set_defaults(func=commands.cmd_resolve)

    p = sub.add_parser(
        "ls", help="list the published NAME:TAGs of the origin", description=helptext.ABOUT["ls"]
    )
    _common(p)
    p.set_defaults(func=commands.cmd_ls)

    p = sub.add_parser(
        "untag",
        help="remove a tag from the origin (its content stays until gc)",
        description=helptext.ABOUT["untag"],
    )
    p.add_argument("ref", metavar="NAME:TAG", help="the tag to remove")
    _common(p)
    p.set_defaults(func=commands.cmd_untag)

    p = sub.add_parser(
        "gc",
        help="list (or with --yes delete) origin objects no tag reaches",
        description=helptext.ABOUT["gc"],
    )
    p.add_argument("--yes", action="store_true", help="delete them (default: dry run, only list)")
    p.add_argument(
        "--grace",
        default="1h",
        metavar="DURATION",
        help="spare objects written less than this long ago, e.g. 30m, 0 (default %(default)s)",
    )
    _common(p)
    p.set_defaults(func=commands.cmd_gc)

    p = sub.add_parser(
        "serve", help="run the read-only OCI registry in the foreground", description=helptext.ABOUT["serve"]
    )
    _trust(p)
    p.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:5050)")
    p.add_argument(
        "--upstream",
        action="append",
        metavar="URL",
        help="pull-through mirror of this registry for names not published here "
        "(repeatable; credentials from ~/.docker/config.json)",
    )
    p.add_argument(
        "--upstream-tag-ttl",
        type=float,
        metavar="SECONDS",
        help="re-check mutable upstream tags after this long (default 300)",
    )
    p.add_argument(
        "--ipfs-gateway",
        action="append",
        metavar="URL",
        help="fetch IPFS content (images nerdctl pushed, served as ipfs/<CID>) from this IPFS "
        "trustless gateway, e.g. http://127.0.0.1:8080 (repeatable; each block checked by its CID)",
    )
    p.add_argument(
        "--allow-public-mirror",
        action="store_true",
        help="mirror with registry credentials even though --listen is beyond loopback "
        "(anyone who reaches it can pull what they reach)",
    )
    p.add_argument(
        "--ui-read-only",
        action="store_true",
        help="the dashboard at /ui/ only shows: no warm, pin, unpin or cache gc from it",
    )
    p.add_argument(
        "--ui-socket",
        metavar="PATH",
        help="also serve the registry and dashboard on this unix socket (mode 0600; whoever "
        "opens it acts as this machine's user: the Docker Desktop extension's backend uses it)",
    )
    p.add_argument(
        "--policy",
        choices=sorted(POLICIES),
        help="which source sends each chunk: prefer-near (LAN peers, then the origin, then "
        "upstream; the default) or origin-only (never peers)",
    )
    p.add_argument(
        "--peer-listen",
        metavar="HOST:PORT",
        help="share this cache with LAN peers on this address (off by default)",
    )
    p.add_argument(
        "--peer-dns",
        action="append",
        metavar="NAME[:PORT]",
        help="take every address NAME resolves to as a peer listening on PORT (default 5051), "
        "looked up at start and every 30 s, e.g. a Kubernetes headless Service (repeatable)",
    )
    p.add_argument("--peer-rate", metavar="BYTES/S", help="upload limit to peers, e.g. 50M (default: none)")
    p.add_argument(
        "--peer-max-requests",
        type=int,
        metavar="N",
        help="concurrent uploads to peers (blob spans, blocks) before answering 429 (default 32)",
    )
    p.add_argument(
        "--cache-max",
        metavar="SIZE",
        help="evict least recently used unpinned blobs to keep the cache under this, e.g. 20G",
    )
    _peers(p)
    _common(p)
    p.set_defaults(func=commands.cmd_serve)

    p = sub.add_parser(
        "warm",
        help="fetch an image completely into the cache (--lan: into every peer's)",
        description=helptext.ABOUT["warm"],
    )
    _trust(p)
    p.add_argument("ref", metavar="REF", help="NAME:TAG or ipfs/<CID>")
    p.add_argument("--lan", action="store_true", help="ask every known peer to warm it too")
    p.add_argument("--pin", action="store_true", help="pin the image once warmed (never evicted)")
    _ipfs_gateway(p)
    _peers(p)
    _common(p)
    p.set_defaults(func=commands.cmd_warm)

    p = sub.add_parser(
        "export",
        help="write an image's whole DAG as a CAR file, for ipfs dag import",
        description=helptext.ABOUT["export"],
    )
    _trust(p)
    p.add_argument("ref", metavar="REF", help="NAME:TAG or ipfs/<CID>")
    p.add_argument(
        "file", metavar="FILE.car", help="the CAR file to write (replaced whole, or left as it was)"
    )
    _ipfs_gateway(p)
    _peers(p)
    _common(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "cache",
        help="manage the local cache: ls, gc, verify, pin, unpin",
        description=helptext.ABOUT["cache"],
    )
    cache_sub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    c = cache_sub.add_parser(
        "ls", help="list cached blobs, partial blobs and totals", description=helptext.ABOUT["cache ls"]
    )
    _common(c, origin=False)
    c.set_defaults(func=commands.cmd_cache_ls)
    c = cache_sub.add_parser(
        "gc",
        help="evict least recently used unpinned blobs until the cache fits",
        description=helptext.ABOUT["cache gc"],
    )
    c.add_argument("--max-size", required=True, metavar="SIZE", help="the size to fit in, e.g. 20G")
    _common(c, origin=False)
    c.set_defaults(func=commands.cmd_cache_gc)
    c = cache_sub.add_parser(
        "verify",
        help="re-hash every blob and block, remove corrupt ones (exit 1)",
        description=helptext.ABOUT["cache verify"],
    )
    _common(c, origin=False)
    c.set_defaults(func=commands.cmd_cache_verify)
    c = cache_sub.add_parser(
        "pin", help="never evict the blobs of an image", description=helptext.ABOUT["cache pin"]
    )
    c.add_argument("ref", metavar="REF", help="NAME:TAG or ipfs/<CID>")
    _ipfs_gateway(c)
    _common(c)
    c.set_defaults(func=commands.cmd_cache_pin)
    c = cache_sub.add_parser("unpin", help="remove a pin", description=helptext.ABOUT["cache unpin"])
    c.add_argument("ref", metavar="REF", help="NAME:TAG or ipfs/<CID>")
    _common(c)
    c.set_defaults(func=commands.cmd_cache_unpin)

    p = sub.add_parser(
        "containerd-config",
        help="print a hosts.toml making p2pimg a containerd mirror",
        description=helptext.ABOUT["containerd-config"],
    )
    p.add_argument("--registry", default="docker.io", help="registry to mirror (default docker.io)")
    p.add_argument("--mirror", default="http://127.0.0.1:5050", help="p2pimg's address (default %(default)s)")
    p.set_defaults(func=commands.cmd_containerd_config)

    p = sub.add_parser(
        "podman-config",
        help="print a registries.conf entry making p2pimg a podman mirror",
        description=helptext.ABOUT["podman-config"],
    )
    p.add_argument("--registry", default="docker.io", help="registry to mirror (default docker.io)")
    p.add_argument("--mirror", default="http://127.0.0.1:5050", help="p2pimg's address (default %(default)s)")
    p.set_defaults(func=commands.cmd_podman_config)

    p = sub.add_parser(
        "demo",
        help="make a sample image, publish it, pull it through the proxy",
        description=helptext.ABOUT["demo"],
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="proxy address (default 127.0.0.1:5050; a free port when that one is busy)",
    )
    p.add_argument(
        "--client",
        choices=["skopeo", "podman", "ctr"],
        default="skopeo",
        help="the client that pulls (default %(default)s; ctr needs a running containerd)",
    )
    p.add_argument(
        "--home",
        metavar="DIR",
        help="work in this home and keep it (default: a temporary one; $P2PIMG_HOME is not used)",
    )
    p.add_argument(
        "--origin",
        metavar="URL",
        help="publish the sample image there (default: the demo "
        "home's own origin; with --home, $P2PIMG_ORIGIN or file://DIR/origin)",
    )
    p.set_defaults(func=commands.cmd_demo)

    p = sub.add_parser(
        "sample",
        help="write a sample image as an OCI layout and a docker archive",
        description=helptext.ABOUT["sample"],
    )
    p.add_argument(
        "dir",
        metavar="DIR",
        nargs="?",
        default=".",
        help="where to write layout/ and app.tar (default: the current directory); neither may exist yet",
    )
    p.set_defaults(func=commands.cmd_sample)
    return parser


def _cmd_export(args: argparse.Namespace) -> int:
    from p2pimg.cli.export import cmd_export  # only this command needs the gateway's walk

    return cmd_export(args)


class OneLineFormatter(logging.Formatter):
    """Log lines carry names, paths and messages that came from the network: control characters
    in them are escaped, so no request can forge a line of the log (tracebacks stay as they are)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), line)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("p2pimg: %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except P2pimgError as exc:
        print(f"p2pimg: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
