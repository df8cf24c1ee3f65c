"""A run's checkpoints: the manager of its stateful parts (:mod:`.manager`), the parts that are
the run's own (:mod:`.parts`), the files of one checkpoint (:mod:`.files`), why a save failed
(:mod:`.failures`), whether one can continue this run (:mod:`.compat`) and the weights a run
starts from (:mod:`.init_from`). The model's sharded state-dict I/O stays with the model
(:mod:`rspo_mega.models.llada.checkpoint`)."""
