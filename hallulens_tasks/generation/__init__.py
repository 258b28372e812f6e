"""`hallulens generate` (HalluLens step 0): source data and prompt-set builders.

`download` fetches upstream files into a resumable, checksum-aware cache; `sources` reads each
source in its upstream format; `mixed_entities` builds the MixedEntities names; `wiki` the
PreciseWikiQA and LongWiki questions (with `sections`), `generated_entities` the
GeneratedEntities names, both through `llm` (a generator on the project's one LLM client,
`hallulens_tasks.llm`); `seeding` gives every random draw; `writer` writes prompts.jsonl +
manifest.json; `cli` is the command. Nothing here imports an engine until a generator call
misses the cache: generating a prompt set needs no GPU.
"""
