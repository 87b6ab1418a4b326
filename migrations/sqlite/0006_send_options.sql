-- How the latest send was asked for (`SendOptions` as JSON), so that a
-- re-send after a failed delivery repeats it. NULL on older rows.
ALTER TABLE verifications ADD COLUMN send_options TEXT;
