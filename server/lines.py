"""The exact bytes each seed endpoint appends, and to which file.

The seed's README append for the intro sent the intro line through the heading formatter
(`\\n## \\n> ...\\n 框架精讲`); here it is its own blockquote paragraph with a blank line before it.
"""

from __future__ import annotations

from server.paths import LOG_FILE, README_FILE

INTRO = "整体的介绍 FastAPI, 快速上手开发, 结合 API 交互文档逐个讲解核心模块的使用"


def found_query(q: str) -> tuple[str, str]:
    return LOG_FILE, f"found query: {q}\n"


def message_to(email: str) -> tuple[str, str]:
    return LOG_FILE, f"message to {email}\n"


def framework_heading(framework: str) -> tuple[str, str]:
    return README_FILE, f"\n## {framework} 框架精讲"


def intro_paragraph() -> tuple[str, str]:
    return README_FILE, f"\n\n> {INTRO}"
