"""sha256 of the source of every Flower object a replacement relies on, per flwr version checked.

Printed by ``python -m shared.flower_compat --hashes`` on the version named; an
entry is added only after reading every source that changed since the last
version checked (README, "Upgrading Flower"). The hashes for 1.41.0 are the
ones the earlier per-module guards carried (same sources, same digests).

1.42.0 (checked 2026-12-07 against the PyPI wheel, every relied-on source
diffed with 1.41.0's): 19 of the 20 sources are byte-identical; in
``run_superexec.run_superexec`` 1.42 only drops the ``traceparent=`` argument
of a tracing span in its task-dispatch loop. The call of ``get_executor`` and
every use of the executor it returns are unchanged, so the warm executor's
replacement means the same on both versions.
"""

CHECKED_SOURCES: dict[str, dict[str, str]] = {
    "1.41.0": {
        "flwr.server.superlink.fleet.vce.backend.raybackend:RayBackend.build":
            "6a0c387457a6dbc1b35091762c24afdd2c3453fe09eeceeb7e966136f832ddc0",
        "flwr.server.superlink.fleet.vce.backend.raybackend:RayBackend.process_message":
            "32a5db14180222d31bb6d622529f0cccab652d4f6c35fd137560240da84010b7",
        "flwr.server.superlink.fleet.vce.vce_api:_register_nodes":
            "88a1cb6749e876ed204b9b250b6846dae53e8a20a5df1f79cff060eacab9b998",
        "flwr.server.superlink.fleet.vce.vce_api:add_messages_to_queue":
            "953f4bd41a931a7779a4a670ab17b633f6e20b08a0128535328674466419777a",
        "flwr.server.superlink.fleet.vce.vce_api:run_api":
            "f85c0cd6e902752f455c00ab9c7212c1cd94a8c681fa9bf294ba967463390898",
        "flwr.server.superlink.fleet.vce.vce_api:worker":
            "60f308688ba34fb5bc942ac68c1d97be61b2010e8d4c3983833f646c5c038157",
        "flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState.get_message_ins":
            "6547c8dcbc62e12f5b2aa5c69f4de8c7c7072c10d6c0876512cf37197d941056",
        "flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState.store_message_ins":
            "a2b78afac51dc4a23d236ccf8d02958c8d0532aac179cd9ad9b1a0d939eecbea",
        "flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState.store_message_res":
            "52a4f7ccc70e890843671cc17e603239f50b88de2a0c5d30810a19021c9d594d",
        "flwr.simulation.ray_transport.ray_actor:BasicActorPool.__init__":
            "b9c2ef0d7bfedaeb42788fe17a71efc11a46c0fb369f030d34d99b5bb4a1acef",
        "flwr.simulation.ray_transport.ray_actor:BasicActorPool.add_actor_back_to_pool":
            "e88f89e6e878f4ce106cf1ef59b4aec3f50882ce408d6df0ab7e1953cf375d96",
        "flwr.simulation.ray_transport.ray_actor:BasicActorPool.fetch_result_and_return_actor_to_pool":
            "4e9babbe276dedd796dea84d4b55d84d638300152602c4624ff7e9796a07a24a",
        "flwr.simulation.ray_transport.ray_actor:BasicActorPool.submit":
            "672402921baad47352ebe3133ebd90248314959ce3836f08b6c8723111ec17c9",
        "flwr.simulation.ray_transport.ray_actor:BasicActorPool.terminate_all_actors":
            "57b5aa6c2232e405894f6f9d430e04ee46860f6f2716d50f69124b5e7dbbb3ce",
        "flwr.supercore.inflatable.inflatable_utils:pull_and_inflate_object_from_tree":
            "139811483a15e4a6c1f8523614c12f28dd3049194e5713816be0931387adb1cf",
        "flwr.supercore.inflatable.inflatable_utils:pull_objects":
            "31bb2de46b450e6acfadb7a8bb15e3f2074bb112199826a40a5eaa648bad5b2b",
        "flwr.supercore.superexec.run_superexec:get_executor":
            "891abfc53747803dd68ebd6e2f544b61b3aebc284391734178d0fc2561704d4a",
        "flwr.supercore.superexec.run_superexec:run_superexec":
            "d11f4e7fbc8f0b121804772495484fae8987b2b52af8b2baa70baf40d5929e26",
        "flwr.superlink.grid:InMemoryGrid.__init__":
            "028fa3ed6b4181bb6685e4d7f940fcfcc218b9eaeed379d6b4cceb7b300bb410",
        "flwr.supernode.start_client_internal":
            "d6342f743fdf768f63305b88414ae2654e9a21bda153739da19c608e8d375067",
    },
}
# 1.42.0: 1.41.0's sources, with the one that changed (see above)
CHECKED_SOURCES["1.42.0"] = {
    **CHECKED_SOURCES["1.41.0"],
    "flwr.supercore.superexec.run_superexec:run_superexec":
        "91e7a33c5b898f33249c29d2058c57637ca7668a14c27296d2506dc98ac84f9b",
}
