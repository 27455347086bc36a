"""``edgexfer device serve``: the device as a long-running service (docs/service.md).

Needs the ``serve`` extra (Starlette, uvicorn, python-multipart, prometheus-client); no torch.
"""
