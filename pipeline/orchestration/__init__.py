"""The pieces of the Prefect orchestration of the DVC pipeline; the flows themselves and the CLI are in
:mod:`pipeline.flows`, which re-exports the public names of these modules.

* :mod:`.settings`   -- the ``flows:`` section of params.yaml (FlowSettings)
* :mod:`.dag`        -- the stage DAG as DVC gives it, and sub-DAG selection
* :mod:`.stages`     -- running one DVC stage (streamed output, failures, retries, dvc commit after)
* :mod:`.concurrent` -- independent stages side by side within a thread budget, then ``dvc commit``
* :mod:`.cluster`    -- those stages on a dask.distributed cluster: what its machines share, their threads
* :mod:`.shards`     -- merging the folders of a stage's ``--shard i/N`` runs; the flows' Dask task runner
* :mod:`.artifacts`  -- gate, metrics and report artifacts
* :mod:`.parameters` -- profile and overrides applied to params.yaml, and their run artifact
"""
