"""The trajectory store and the ``datasets`` stage: shard writer/reader (:mod:`.store`), build,
validate, relabel, stats, Hub sharing (:mod:`.hub`) and conversion to d3rlpy
(:mod:`.d3rlpy_convert`). Layout: :mod:`.schema` (store) and :mod:`.build` (dataset)."""
