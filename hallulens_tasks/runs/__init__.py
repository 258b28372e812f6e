"""What a run leaves behind and the commands over it: the harness's samples files (`samples`),
verdicts joined to the store (`labels`), the seed's output files (`legacy`) and the seed's
one-command workflow (`pipeline`)."""
