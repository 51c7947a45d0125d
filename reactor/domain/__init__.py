"""Pure domain logic: campaign documents, schedules, retry policy and templates. No I/O here."""
