"""The release, in one place: the factory, the pages and the OpenAPI document read it here."""
__version__ = "0.6.0"
