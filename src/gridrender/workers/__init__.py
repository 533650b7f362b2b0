"""The GPU side: Celery tasks, resident pipelines, CLIP encoding, rendering.

Workers may import the scheduler's job and storage modules, never the other way round.
"""
