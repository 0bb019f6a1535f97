"""Task tables in and answers out: one record type and reader (`records`), prompt templates
(`templates`), the encode-once-ask-many loop (`answer`), the resumable writer and run record
(`output`), and the batch job that ties them together (`job`)."""

from .answer import answer_tasks
from .job import JobResult, JobSpec, run_job
from .output import AnswerWriter, RunSettings
from .records import IMAGE_ERRORS, Columns, Problems, Task, read_all, read_tasks
from .templates import TEMPLATES

__all__ = ["IMAGE_ERRORS", "TEMPLATES", "AnswerWriter", "Columns", "JobResult", "JobSpec", "Problems",
           "RunSettings", "Task", "answer_tasks", "read_all", "read_tasks", "run_job"]
