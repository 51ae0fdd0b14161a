"""Getting ranks running: the barrier stage and its failures (``launch``), who a rank is and its collectives
(``rank``, ``engines``), stall detection (``heartbeat``), the SparkSession, local and networked clusters,
fault injection.

Imports nothing: importing one module of the group never loads the others."""
