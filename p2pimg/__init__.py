"""p2pimg: a peer-to-peer container image fetcher behind a read-only OCI registry."""

from .cid import Cid
from .errors import P2pimgError
from .model import BlobMap, ImageRoot, TagRecord

__version__ = "0.1.0"

__all__ = ["BlobMap", "Cid", "ImageRoot", "P2pimgError", "TagRecord", "__version__"]
