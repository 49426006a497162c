"""Operations (issue 7): systemd notification and watchdog, health, Prometheus metrics, JSON
logs, host checks (disk, clock). Standard library plus ``prometheus_client``; torch-free.

The daemon owns one :class:`~edge_stn.ops.supervisor.Supervisor`, which its run loop ticks once
a second; everything here reads the daemon's counters and never slows its stages down.
"""
