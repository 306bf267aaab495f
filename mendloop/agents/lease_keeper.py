"""Keeping a claimed work order's lease alive: a heartbeat every interval from the claim until the runner's
report has been answered, and a cancel signal for the agent when the server asks to stop or the lease is gone."""

from __future__ import annotations

import logging
import threading

from mendloop.errors import Conflict, MendloopError
from mendloop.infra.api_client import AgentClient, Claim

log = logging.getLogger(__name__)


class LeaseKeeper(threading.Thread):
    """Heartbeats every `interval` seconds; sets `cancel` when the server asks to stop or the lease is gone.

    It keeps beating while the runner reports (`begin_reporting`): reporting can take a while (the server's own
    checks, a loaded machine), and a lease that lapsed before the report arrived would have the work order
    reaped - failed, once its attempts are used up - and the report refused. Once reporting has begun, a refused
    heartbeat is no news (the report itself may have just ended the lease); the report's own answer decides.
    """

    def __init__(self, client: AgentClient, claim: Claim, cancel: threading.Event) -> None:
        super().__init__(name=f"heartbeat-{claim.work_order_id}", daemon=True)
        self.client = client
        self.claim = claim
        self.cancel = cancel
        self.interval = max(0.2, claim.heartbeat_interval_seconds)
        self.note = "claimed"
        self.lease_lost = False
        self.cancel_requested = False
        self._reporting = False
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def run(self) -> None:
        wo_id = self.claim.work_order_id
        while not self._stop_event.wait(self.interval):
            try:
                beat = self.client.heartbeat(wo_id, self.claim.lease_id, self.note)
            except Conflict as exc:
                with self._lock:
                    if self._reporting:
                        return
                    self.lease_lost = True
                log.warning("work order %s: lease lost (%s); stopping the agent", wo_id, exc)
                self.cancel.set()
                return
            except MendloopError as exc:
                log.warning("work order %s: heartbeat failed: %s", wo_id, exc.message)
                continue
            if beat.cancel_requested:
                with self._lock:
                    if self._reporting:
                        continue  # the report is on its way; the server's answer to it says what happened
                    self.cancel_requested = True
                log.warning("work order %s: cancel requested; stopping the agent", wo_id)
                self.cancel.set()
                return

    def begin_reporting(self) -> bool:
        """From now on the lease is kept only for the report. Returns whether it was lost before."""
        with self._lock:
            self._reporting = True
            self.note = "reporting"
            return self.lease_lost

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(5)
