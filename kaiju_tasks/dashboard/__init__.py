"""The web dashboard served at ``/`` by the HTTP server.

Pages: an overview (finished and failed per minute over the last hour, queue depth per app,
tasks by status), tasks (filter by status, app, text and creation time; paged on the server),
one task (stages with params as written and as evaluated, results, error, timeline, tree;
reset, cancel and message actions) and workers. Pages update live over server-sent events.

```python
from kaiju_tasks import dashboard

data = dashboard.DashboardData(pool, dsn)
dashboard.setup(app, dashboard.Dashboard(task_service, token_service, data))
```
"""

from __future__ import annotations

from kaiju_tasks.dashboard.data import DashboardData, EventHub
from kaiju_tasks.dashboard.views import Dashboard, setup

__all__ = ["Dashboard", "DashboardData", "EventHub", "setup"]
