"""Run the sagewatch stages as SageMaker Processing and Training jobs and a Pipeline.

Modules:
    contract     the container paths both sides agree on (no AWS code)
    entrypoints  what runs inside the job containers; imports no AWS SDK
    bundle       the deterministic, content-addressed source archive sent to jobs
    jobs         job requests (CreateProcessingJob / CreateTrainingJob), submit, follow
    workflow     the SageMaker Pipeline definition built from the same requests

Only ``jobs`` and ``workflow`` talk to AWS, through plain boto3; nothing outside this
package imports them, and the command line imports them only inside the
``sagewatch sagemaker`` commands.
"""
