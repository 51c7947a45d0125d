"""A/B splits at run time: the decision run (`decide`) and the report (`report`); the winner
phase itself is the campaign's own run (`execution.run`), which waits for the winner."""
