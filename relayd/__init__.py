"""relayd: an asyncio SMTP submission relay.

Mail flows listener (smtp) -> session policy (policy, quota) -> routing ->
upstream delivery (rewrite, upstream); records flow admin socket (admin/) ->
store. daemon ties the lifecycle together; cli holds the entry points.
"""

__version__ = "0.1.0"
