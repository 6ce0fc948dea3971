"""Protocol handlers: thin translators between HTTP and the upload core."""
