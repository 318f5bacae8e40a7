"""``manage.py listen_requests [--tenant SLUG] [--stream] [--consumer NAME]``: seed 002's Redis channel.

Subscribes to ``ORCHESTRATOR_REQUESTS_CHANNEL`` (``workflow-requests``), starts one run per
``correlation_id`` and publishes each run's result on ``ORCHESTRATOR_RESPONSES_CHANNEL``
(``workflow-responses``) when it finishes. ``--stream``: the same channel as a Redis Stream read
through a consumer group (durable: requests sent while no listener runs are kept). Message
shapes, delivery guarantees and how finished runs are found: ``runs/channels.py``.
Stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import os
import signal
import socket

from django.core.management.base import BaseCommand, CommandError

from orchestrator_site.conf import conf
from runs import channels
from runs.models import Tenant


class Command(BaseCommand):
    help = (
        "Start runs from seed 002's Redis request channel (pub/sub, or a Redis Stream with --stream) "
        "and publish each run's result on the responses channel."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--tenant", default=None, help="tenant slug runs start in (default ORCHESTRATOR_REQUESTS_TENANT)"
        )
        parser.add_argument(
            "--stream", action="store_true", help="read a Redis Stream through a consumer group instead of pub/sub"
        )
        parser.add_argument("--consumer", default=None, help="consumer name in the group (default <host>-<pid>)")

    def redis_client(self):
        """A client of ORCHESTRATOR_REQUESTS_REDIS_URL. Raises CommandError when none is set or reachable."""
        import redis

        url = conf.requests_redis_url
        if not url:
            raise CommandError("ORCHESTRATOR_REQUESTS_REDIS_URL: not set (and the broker is not Redis)")
        try:
            client = redis.Redis.from_url(url, socket_timeout=30, health_check_interval=30)
            client.ping()
        except (redis.RedisError, ValueError) as exc:
            # the URL may hold a password: name the setting, not the URL
            raise CommandError(f"ORCHESTRATOR_REQUESTS_REDIS_URL: cannot connect ({type(exc).__name__})")
        return client

    def tenant_slug(self, given: str | None) -> str:
        slug = given or conf.requests_tenant
        if not Tenant.objects.filter(slug=slug, is_active=True).exists():
            raise CommandError(f"--tenant: no active tenant {slug!r}")
        return slug

    def handle(self, *args, **options) -> None:
        tenant = self.tenant_slug(options["tenant"])
        client = self.redis_client()
        mode = "stream" if options["stream"] else "pubsub"
        responses = conf.responses_channel

        def send(message: dict) -> None:
            if mode == "stream":
                client.xadd(
                    responses, {"message": channels.dumps(message)}, maxlen=conf.responses_maxlen, approximate=True
                )
            else:
                client.publish(responses, channels.dumps(message))

        handler = channels.RequestHandler(
            tenant=tenant,
            reply_to=responses,
            mode=mode,
            send=send,
            max_bytes=conf.requests_max_bytes,
            max_variables_bytes=conf.requests_max_variables_bytes,
            out=lambda line: self.stdout.write(line),
        )
        waiting = handler.recover()
        stopper = channels.Stopper()
        previous = {sig: signal.signal(sig, stopper.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.stdout.write(
            f"listening on {conf.requests_channel} ({mode}) for tenant {tenant}; responses on {responses}; "
            f"{waiting} run(s) awaiting a response"
        )
        try:
            if mode == "stream":
                consumer = options["consumer"] or f"{socket.gethostname()}-{os.getpid()}"
                channels.serve_stream(
                    client,
                    handler,
                    stream=conf.requests_channel,
                    group=conf.requests_group,
                    consumer=consumer,
                    poll=conf.requests_poll,
                    claim_idle=conf.requests_claim_idle,
                    stopper=stopper,
                )
            else:
                channels.serve_pubsub(
                    client, handler, channel=conf.requests_channel, poll=conf.requests_poll, stopper=stopper
                )
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
            client.close()
        self.stdout.write(f"stopped; {len(handler.waiting)} run(s) still awaiting a response (sent after a restart)")
