"""The trained model in use: batch scoring, the Spark ML estimator, the served (pyfunc) form of a sparse model.

Imports nothing: importing one module of the group never loads the others."""
