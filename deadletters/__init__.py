"""``deadletters``: what an operator does with ``campaign.deadletter`` (list, replay, purge)."""
