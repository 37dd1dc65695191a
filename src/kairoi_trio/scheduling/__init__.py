"""Recurring jobs: when a schedule's occurrences fall, and what the server does
when they are missed or overlap. Pure code: no clock, no I/O, no Trio.

- occurrences.py: a Schedule (cron or interval, zone, bounds) -> its instants;
  next after t, latest at or before t, counting; daylight-saving rules.
- planner.py: a recurring job's life: first occurrence, after a run,
  misfire (catch-up) and overlap policies, pause, resume, run-now.
"""
