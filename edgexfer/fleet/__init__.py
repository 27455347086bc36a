"""Fleet learning of heads with Flower (host side): the ServerApp's rounds, the result bundle, the deployment.

Nothing here is imported by ``edgexfer`` or ``edgexfer.cli`` at start-up; ``flwr`` is imported inside
the functions that need it (the ``fleet`` extra).
"""
