"""What runs inside Flower's ClientApp at a site: message handlers, the DP round, secure aggregation, the egress
guard and audit log every reply passes, the site's node config, and memory release after a message (a site's own
local-norm weights file is :mod:`client.inference.site_weights`: predict reads it too).

``client/client_app.py`` registers these handlers with Flower; the site commands reuse the site config and state.
"""
