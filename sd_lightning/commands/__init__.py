"""The commands, one module per ``stage=`` (``train``: stage=vae and stage=ldm; ``sample``,
``export``, ``encode``, ``shards``), their checks before anything is built (``preflight``,
``options``), and what they share: opening any file a user names (``open``), ``pretrained=``
and resuming."""
