"""``idcscope serve``: a local web app for patches, patients' zips and whole slides."""

from .app import Settings, create_app

__all__ = ["Settings", "create_app"]
