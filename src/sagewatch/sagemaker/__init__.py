"""Run the sagewatch stages as SageMaker Processing and Training jobs and a Pipeline.

Modules:
    contract     the container paths both sides agree on
    entrypoints  what runs inside the job containers (imports no AWS code)
    bundle       the deterministic, content-addressed source archive sent to jobs
    target       role, bucket, region, image and S3 layout from the settings
    jobs         the CreateProcessingJob / CreateTrainingJob request builders
    validation   offline checks of a request against botocore's service model
    plans        validated requests plus the uploads they need (what --plan prints)
    workflow     the SageMaker Pipeline definition built from the same builders
    launch       upload, submit and follow jobs and pipeline executions (boto3)

Only ``launch`` calls AWS, through plain boto3 (the reasons are in
:mod:`.jobs`). Nothing outside this package imports them, and the command line
imports them only inside the ``sagewatch sagemaker`` commands.
"""
