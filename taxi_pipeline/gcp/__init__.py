"""Google Cloud plumbing: resource names, clients, and the one-time project setup."""
