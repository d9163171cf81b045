"""XML web-service HIS adapter (issue 4): see adapter.py."""
