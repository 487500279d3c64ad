-- kaiju-tasks 0011: the tree index holds only the tasks whose root is another task.
--
-- Every task has a root_id, and most are their own root (root_id = id). Indexing those cost
-- every new task one more index entry, on a random key, to find a row the primary key already
-- finds. Listings filtering root_id by equality or a list are written (by kaiju_tasks.store.tables)
-- as "(root_id = x AND root_id <> id) OR (id = x AND root_id = x)": this index serves the first
-- arm, the primary key the second.
DROP INDEX tasks_root_idx;
CREATE INDEX tasks_root_idx ON tasks (root_id) WHERE root_id <> id;
