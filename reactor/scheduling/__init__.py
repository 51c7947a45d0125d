"""Scheduling: when campaigns start and end. The watcher follows the change stream, the
reconciler sweeps as a safety net, both feed the scheduler's one idempotent `sync`, which arms
timers on one heap; barriers let the sweep tell what the stream missed from what it had not yet
delivered."""
