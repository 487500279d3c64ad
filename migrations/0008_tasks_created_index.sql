-- kaiju-tasks 0008: newest tasks first without sorting the table. The dashboard's task list
-- and tasks.list sorted by creation read this index backwards; new tasks append at its end.
CREATE INDEX tasks_created_idx ON tasks (created, id);
