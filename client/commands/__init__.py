"""The site commands of ``python -m client COMMAND`` (each module: ``add_arguments`` and ``run``), for hospital IT.

``audit`` reads the egress audit log, ``check-data`` and ``fingerprint`` the site's data, ``predict``/``export``
run a federated model, ``finetune`` adapts one locally, ``keygen`` makes the node's key pair.
"""
