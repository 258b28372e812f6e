"""`hallulens generate` (HalluLens step 0): source data and prompt-set builders.

`download` fetches upstream files into a resumable, checksum-aware cache; `sources` reads each
source in its upstream format; `mixed_entities` builds the MixedEntities names. Nothing here
imports an engine: generating a prompt set must not need a GPU.
"""
