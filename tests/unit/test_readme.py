"""The README's two set-up commands are the project's contract with a fresh machine."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands_install_and_run():
    text = (ROOT / "README.md").read_text()
    assert text.index("```bash") < text.index("\n## ")  # before anything else of substance
    job, tests = readme_commands()
    assert "pip install" in job and "orchestrator run examples/gpt.yaml" in job
    assert "pip install" in tests and "pytest" in tests


def test_ci_runs_both_readme_commands_in_a_new_virtual_environment():
    job, tests = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    ci_lines = [line.strip() for line in ci.splitlines()]
    assert tests in ci_lines
    # The job command as written, shortened only by overrides appended to it.
    assert any(line.startswith(job + " --set ") for line in ci_lines), ci
    assert "python3 -m venv" in ci and 'export PATH="$work/venv/bin:$PATH"' in ci


def test_the_main_job_config_exists_and_injects_the_documented_kills():
    from orchestrator.config import load_config

    config = load_config(ROOT / "examples" / "gpt.yaml")
    assert config.workload.entrypoint == "workloads.gpt:train"
    assert [(f.kind, f.rank, f.at_step) for f in config.chaos.faults] == [
        ("kill", 1, 12), ("kill_during_save", 0, 20)]
