"""A redis-server of the test's own, on a free loopback port and without persistence, so a test
can take Redis away (`stop`) and bring it back empty (`start`) without touching the shared one
on 6379 that other tests use. The fleet drill's own Redis is the same class."""

from gateway.drill.fleet_services import RedisServer

__all__ = ["RedisServer"]
