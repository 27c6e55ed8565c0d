"""Where data and weights live: S3 or MinIO.

- :mod:`~d2ops.storage.s3`: parallel, cached, atomic transfers (download, sync, upload), URIs and errors;
- :mod:`~d2ops.storage.credentials`: S3 credentials from the environment and clearml.conf, as a public API;
- :mod:`~d2ops.storage.local_s3`: a local S3 endpoint (moto's server on 127.0.0.1) for the demo and the tests.
"""
