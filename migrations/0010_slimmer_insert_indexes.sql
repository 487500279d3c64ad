-- kaiju-tasks 0010: two indexes every new task enters lose their trailing id.
--
-- A bulk create inserts each task into the queue index and the creation-time index. Both ended
-- in the task id only to break ties, and random ids spread a batch (one creation time, one
-- queued_at) over the whole index. Without the id, the entries of a batch share one key, which
-- btree stores as a posting list: inserting is cheaper and the indexes are a fraction of the size.
--
-- Ties keep an order: btree orders equal keys by their row's place in the table, which for a
-- batch written into fresh space follows the order it was given in (space freed by deleted
-- tasks may be reused out of order; before, ties went by the random id). Claims take the queue
-- in that order (priority, then queued_at, then the row's place); newest-first listings still
-- break ties by id, sorting only the rows that share one creation time.
DROP INDEX tasks_queue_idx;
CREATE INDEX tasks_queue_idx ON tasks (app_name, priority DESC, queued_at)
    WHERE status = 'QUEUED';

DROP INDEX tasks_created_idx;
CREATE INDEX tasks_created_idx ON tasks (created);
