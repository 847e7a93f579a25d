"""The drop-in FastAPI router of the original module (see issue 3)."""
