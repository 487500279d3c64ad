"""The user guide's service examples, run as written (the guide's missing commas restored).

``self.app.name`` in the guide is the calling application's name; here a stand-in object
provides it.
"""

from __future__ import annotations

from types import SimpleNamespace

from kaiju_tasks import Message, NotificationService, Task, TaskCommand, TaskStatus, Timer, testing
from kaiju_tasks.templates import Condition

self = SimpleNamespace(app=SimpleNamespace(name="orders"))

# fmt: off


async def test_creating_tasks(task_service):
    task = await task_service.create(Task(
        app=self.app.name,
        id='orders.delete_expired',
        commands=[
            TaskCommand(method='orders.delete', params={'conditions': {'expired': True}}),
            TaskCommand(method='cache.clear', params=None)
        ]
    ))
    assert task["id"] == "orders.delete_expired"
    assert task["app_name"] == "orders"
    assert [c["method"] for c in task["commands"]] == ["orders.delete", "cache.clear"]
    assert task["commands"][0]["params"] == {"conditions": {"expired": True}}


async def test_retries(task_service):
    task = await task_service.create(Task(
        id='server.sync',
        commands=[{'method': 'server.sync'}],
        max_retries=3,
        restart_policy='CURRENT'  # CURRENT or FIRST
    ))
    assert task["max_retries"] == 3
    assert task["restart_policy"] == "CURRENT"


async def test_periodic_tasks(task_service):
    task = await task_service.create(Task(
        id='cache.update',
        commands=[TaskCommand(method='cache.update')],
        cron='* * * * 1'
    ))
    assert task["cron"] == "* * * * 1"
    assert task["status"] == TaskStatus.IDLE
    assert task["next_run"] == "2030-01-07T00:00:00+00:00"  # the first Monday after the clock


async def test_sharing_data_between_stages(task_service):
    task = await task_service.create(Task(
        id='my_task',
        commands=[
            TaskCommand(method='items.m_get', params={'conditions': {'marked': True}}),
            TaskCommand(method='[kws.command_name]', params={'id': '[0.data.id]'})
        ],
        kws={'command_name': 'items.m_delete'}
    ))
    assert task["commands"][1] == {
        "kind": "call", "method": "[kws.command_name]", "params": {"id": "[0.data.id]"},
        "condition": None, "max_timeout": None,
    }
    assert task["kws"] == {"command_name": "items.m_delete"}


async def test_conditions(task_service):
    task = await task_service.create(Task(
      app=self.app.name, id='products.update_prices',
      commands=[
          # suppose it returns a 'count' of actually updated items
          TaskCommand(method='products.update_attributes'), # -> {'count': 1000}
          # this command will be executed only if the previous stage 'count' > 0
          TaskCommand(
            method='products_cache.refresh',
            condition=Condition({'0.count': {'gt': 0}})
          )
      ]
    ))
    assert task["commands"][1]["condition"] == {"0.count": {"gt": 0}}


async def test_conditions_with_templates(task_service):
    task = await task_service.create(Task(
      app=self.app.name, id='products.update_prices',
      commands=[
          # suppose you have 'update_threshold'- min number of updated rows required for a cache refresh
          TaskCommand(method='settings.get'),  # -> {..., 'cache': {'update_threshold': 42, ...}}
           # suppose it returns 'count' of actually updated items
          TaskCommand(method='products.update_attributes'),  # -> {'count': 1000}
          # refresh cache only if updated item 'count' > 'update_threshold'
          TaskCommand(
            method='products_cache.refresh',
            condition=Condition({'1.count': {'gt': '[0.cache.update_threshold]'}})
          )
      ]
    ))
    assert task["commands"][2]["condition"] == {"1.count": {"gt": "[0.cache.update_threshold]"}}


async def test_timers(task_service):
    task = await task_service.create(Task(
      app=self.app.name, id='orders.delete_expired',
      commands=[
          TaskCommand(method='orders.delete', params={'conditions': {'expired': True}}),
          Timer(100),
          TaskCommand(method='cache.clear', params=None)
      ]
    ))
    assert task["commands"][1] == {"kind": "timer", "seconds": 100, "condition": None}


async def test_messages(task_service, store, clock):
    task = await task_service.create(Task(
      app=self.app.name,
      id='orders.delete_expired',
      commands=[
           # ask for a data report file
          TaskCommand(method='statistics.request_report', params={'callback_id': '[id]'}),
          # wait until TaskService.write_message receives a message for this task
          Message(max_timeout=None),
          # message will be available in the results
          TaskCommand(method='files.download', params={'url': '[1.url]'})
      ]
    ))
    assert task["commands"][1] == {"kind": "message", "max_timeout": None, "condition": None}
    # The engine runs stage 0 and parks the task on the Message stage:
    await testing.make_task(
        store, clock.now(), id="my_task_id", status="WAITING", stage=1,
        commands=task["commands"], result=[{"ok": True}],
    )
    await task_service.write_message(
        "my_task_id", {"url": "http://statistics.example/reports/324934"}
    )
    data = await task_service.get("my_task_id", columns=["status", "stage", "result"])
    assert data == {
        "status": "QUEUED",
        "stage": 2,
        "result": [{"ok": True}, {"url": "http://statistics.example/reports/324934"}],
    }


async def test_results(task_service):
    my_task = await task_service.create(Task(commands=[TaskCommand(method='do.job')]))
    # TaskService
    data = await task_service.get(
      id=my_task['id'],
      columns=['result', 'exit_code', 'error']
    )
    # exit_code != 0 means error, exit_code == None means that the task yet to be executed
    assert data == {"result": [], "exit_code": None, "error": None}


async def test_notification_lists(task_service, store, clock):
    notifications = NotificationService(store)
    task = await task_service.create(Task(commands=[TaskCommand(method='do.job')], notify=True))
    for i in range(2):
        await store.insert_notification(testing.notification_row(
            clock.advance(1), task_id=task["id"], job_id=task["job_id"] if i else "earlier",
            result=[i],
        ))
    # NotificationService
    # all results for the task sorted by date
    page = await notifications.list(
      conditions={'task_id': task['id']},
      sort=[{'desc': 'created'}],
      columns=['result']
    )
    assert page["data"] == [{"result": [1]}, {"result": [0]}]
    # a result for a particular job
    data = await notifications.list(
      conditions={'task_id': task['id'], 'job_id': task['job_id']},
      columns=['result']
    )
    assert data["data"] == [{"result": [1]}]


async def test_chaining_tasks(task_service):
    next_task = await task_service.create(
      Task(commands=[
        TaskCommand(method='do.something.else')
      ])
    )
    task = await task_service.create(
      Task(commands=[
        TaskCommand(method='do.something')
      ], next_task=next_task['id'])
    )
    assert task["next_task"] == next_task["id"]


async def test_resetting_tasks(task_service, make_task):
    await make_task(id="my_task_id", status="FAILED", exit_code=1, error={"message": "x"})
    # TaskService
    await task_service.reset(id='my_task_id')
    assert (await task_service.get("my_task_id"))["status"] == "QUEUED"
