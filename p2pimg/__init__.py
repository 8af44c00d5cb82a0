"""p2pimg: a peer-to-peer container image fetcher behind a read-only OCI registry."""

from p2pimg.content.cid import Cid
from p2pimg.content.model import BlobMap, ImageRoot, TagRecord
from p2pimg.errors import P2pimgError

__version__ = "0.1.0"

__all__ = ["BlobMap", "Cid", "ImageRoot", "P2pimgError", "TagRecord", "__version__"]
