"""PyPNM web service.

Kept import-free on purpose: the supervisor and the fork template import this
package to find the project on disk, and must not pull the application in.
"""

__version__ = "0.1.0"
