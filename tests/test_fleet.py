"""[fleet]: several MX hosts coordinated through a real three-member etcd cluster (tests/fixtures/etcd.py)."""

from __future__ import annotations

import asyncio

from tests.fixtures.etcd import EtcdCluster, etcd_cluster  # noqa: F401 - the fixture


def test_three_member_cluster_answers_put_and_get_on_every_member(etcd_cluster: EtcdCluster) -> None:
    import aetcd

    async def check() -> list[bytes]:
        values = []
        first, *others = etcd_cluster.client_ports.values()
        async with aetcd.Client(host="127.0.0.1", port=first, timeout=5) as client:
            await client.put(b"/test/hello", b"world")
        for port in others:  # written through one member, read through each of the others (linearizable)
            async with aetcd.Client(host="127.0.0.1", port=port, timeout=5) as client:
                got = await client.get(b"/test/hello")
                assert got is not None
                values.append(got.value)
                members = [m async for m in client.members()]
                assert len(members) == 3
        return values

    assert asyncio.run(check()) == [b"world", b"world"]
