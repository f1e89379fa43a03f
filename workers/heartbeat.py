"""The heartbeat service: every heartbeat interval, renews the leases of the tasks in flight and
says which were lost (another attempt owns them now, or their job was cancelled)."""
from __future__ import annotations

import asyncio
import logging

from outbox import queue
from outbox.errors import describe_error
from workers.logs import task_fields
from workers.pool import UNREACHABLE
from workers.state import Service

log = logging.getLogger("workers")


class Heartbeat(Service):
    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            await self.renew()

    async def renew(self) -> None:
        state = self.state
        ids = list(state.in_flight)
        if not ids:
            return
        try:
            async with self.pool.connection() as conn:
                rows = await (await conn.execute(queue.HEARTBEAT, (self.owner, ids, self.settings.lease_s))).fetchall()
        except UNREACHABLE as exc:
            log.warning("heartbeat failed (%s); leases run out in %.0f s unless the database comes back",
                        describe_error(exc), self.settings.lease_s)
            return
        # Not lost: tasks that left in_flight meanwhile, or whose completion is being recorded
        # (it may have committed, ending the lease, just before this heartbeat).
        lost = set(ids) - {r["id"] for r in rows} - (set(ids) - set(state.in_flight)) - state.settling
        for task_id in lost:
            task = state.in_flight.get(task_id)
            if task:
                log.warning("lease lost for task %s (%s, %s): its result will be dropped", task_id, task.stage,
                            task.subject, extra=task_fields(task))
