"""What runs inside Flower's ClientApp at a site: message handlers, the DP round, secure aggregation, the egress
guard and audit log every reply passes, the site's node config, its local state, and memory release after a message.

``client/client_app.py`` registers these handlers with Flower; the site commands reuse the site config and state.
"""
