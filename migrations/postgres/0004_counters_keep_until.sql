-- A counter window stays readable until the end of the window after it: a
-- sliding-window limit weighs the previous window's total. The column says
-- when a row may be forgotten, not when its window ends.
ALTER TABLE counters RENAME COLUMN window_end TO keep_until;
