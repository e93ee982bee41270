"""A study's result files: JSON and Markdown, with the machine the results came from and their times."""
import json
import os
import platform
import statistics


def load_average():
    """The 1 / 5 / 15 minute load averages (rounded), or None where the system has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device, load_at_start=None):
    """Platform, Python, torch, cores / GPU, and the load at the start and now; ``summary`` is one line of it."""
    import torch

    info = {'platform': platform.platform(), 'machine': platform.machine(), 'processor': platform.processor(),
            'python': platform.python_version(), 'torch': torch.__version__, 'cpu_count': os.cpu_count(),
            'torch_threads': torch.get_num_threads(), 'cuda_available': torch.cuda.is_available(),
            'device': str(device)}
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    info['load_average_at_start'], info['load_average_at_end'] = load_at_start, load_average()
    where = info.get('gpu') or f'{info["cpu_count"]}-core {info["machine"]} CPU'
    info['summary'] = f'{where}, torch {info["torch"]}, Python {info["python"]}, {info["platform"]}'
    return info


def fmt_time(seconds):
    """``m:ss``, or ``-`` for None."""
    if seconds is None:
        return '-'
    return f'{int(seconds) // 60}:{int(seconds) % 60:02d}'


def mean_std(values):
    """``(mean, sample std)`` of ``values``: ``(None, None)`` when empty, std None for a single value."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def write_json(path, value):
    """Write ``value`` to ``path`` as indented JSON."""
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(value, f, indent=2)


def write_results(stem, results, markdown):
    """Write ``<stem>.json`` (``results``) and ``<stem>.md`` (``markdown``)."""
    write_json(f'{stem}.json', results)
    with open(f'{stem}.md', 'w', encoding='utf-8') as f:
        f.write(markdown)
