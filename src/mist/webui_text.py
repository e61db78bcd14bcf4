"""Every string the web UI shows, in English and in Simplified Chinese.

`EN` and `ZH` have the same keys. Keys in `LABEL_KEYS` are labels and help texts rendered by the browser through
gradio's i18n (ICU message syntax, so they hold no braces); the other keys are messages formatted here with
`str.format` fields. Engine errors (a file's problem, the model search) stay in English and are quoted as they are.
"""

from __future__ import annotations

LANGUAGES: dict[str, str] = {"en": "English", "zh": "中文"}

EN: dict[str, str] = {
    # --- page, labels and help (LABEL_KEYS) ---
    "title": "Mist: protect artworks from AI mimicry",
    "heading": "## Mist: protect artworks from AI mimicry",
    "intro": (
        "Mist adds a small, hard-to-see perturbation to an image so that AI models trained on it or editing it "
        "(img2img, textual inversion, DreamBooth, LoRA) produce scrambled results. Upload an image, optionally paint "
        "the region to protect, and press **Protect**. Everything runs on this computer."
    ),
    "language": "Language",
    "tab_single": "One image",
    "tab_batch": "Several images",
    "editor": "Image (paint the region to protect)",
    "editor_hint": (
        "Upload an image, then paint with the brush over the region to protect. Painted pixels are protected; "
        "with nothing painted, the whole image is protected."
    ),
    "files": "Images",
    "files_hint": "Upload several images at once; each one is protected everywhere (no mask).",
    "advanced": "Advanced",
    "strength": "Strength (epsilon)",
    "strength_info": "Largest change of a pixel, in levels out of 255. Higher protects more but is more visible.",
    "steps": "Steps",
    "steps_info": "Attack iterations. More steps protect better and take longer.",
    "size": "Output size",
    "size_info": "The image is resized to this square (its shorter side, in no-resize mode).",
    "mode": "Mode",
    "mode_info": "Textural pulls the image toward a target pattern; semantic confuses the denoiser; fused does both.",
    "mode_textural": "Textural",
    "mode_semantic": "Semantic",
    "mode_fused": "Fused",
    "fused_weight": "Fused weight",
    "fused_weight_info": "Fused mode only: the semantic loss is weighted by 10^(w+3).",
    "low_vram": "Low-VRAM mode",
    "low_vram_info": "Protect the image as 2 x 2 tiles: much less GPU memory (the original's block_num 2).",
    "no_resize": "No-resize mode",
    "no_resize_info": (
        "Keep the aspect ratio: the shorter side goes to the output size, each side down to a multiple of 8 (16 in "
        "low-VRAM mode)."
    ),
    "seed": "Seed",
    "seed_info": "Same seed and settings, same output.",
    "precision": "Precision",
    "precision_info": (
        "Network arithmetic (losses stay 32-bit). auto: bf16 where it is fast, else fp32; fp16 needs a CUDA GPU."
    ),
    "fast": "Fast mode (a different, faster method)",
    "fast_info": (
        "Score-distillation approximation of the semantic gradient (Xue et al., ICLR 2024): about twice as fast, "
        "but not Mist's exact method."
    ),
    "run": "Protect",
    "cancel": "Cancel",
    "original": "Original (as processed)",
    "protected": "Protected",
    "perturbation": "Perturbation (amplified)",
    "gallery": "Protected images (click one to compare)",
    "downloads": "Downloads (PNG with settings in its metadata; ZIP for several)",
    # --- messages (str.format) ---
    "waiting": "Submitted. Jobs run one at a time; this page shows its place in the queue, then the progress.",
    "loading_model": "Loading the model (only on the first job)...",
    "progress": "Image {image} of {images}, step {step} of {steps}, about {eta} left",
    "preparing": "Image {image} of {images}: preparing",
    "done": "Done: {done} of {images} image(s) protected in {time}.",
    "cancel_requested": "Cancelling after the current step...",
    "cancelled": "Cancelled. {done} image(s) finished before the cancel are below.",
    "no_input": "Upload an image first.",
    "no_model": "No Stable Diffusion model was found, so nothing can be protected yet. How to get one:",
    "model_failed": "The model could not be loaded:",
    "invalid_settings": "Invalid settings:",
    "no_protection": (
        "WARNING: this server runs a random-weight test model: the images it makes have NO protection (their PNG "
        "metadata says so too)."
    ),
    "too_large": "{name}: the file is {size} MB, above this server's limit of {limit} MB.",
    "bad_file": "Skipped {name}: {problem}",
    "failed": "{name} failed: {problem}",
    "out_of_memory": "out of memory: try Low-VRAM mode or a smaller output size",
    "nothing_done": "No image was protected.",
    "duration_s": "{s} s",
    "duration_m": "{m} min {s} s",
    "duration_h": "{h} h {m} min",
}

ZH: dict[str, str] = {
    "title": "Mist：保护艺术作品免受 AI 模仿",
    "heading": "## Mist：保护艺术作品免受 AI 模仿",
    "intro": (
        "Mist 会在图片上加入细微、难以察觉的扰动，使基于它训练或对它进行编辑的 AI 模型（img2img、文本反演、"
        "DreamBooth、LoRA）只能得到混乱的结果。上传图片，（可选）涂抹需要保护的区域，然后点击**开始保护**。"
        "所有计算都在本机完成。"
    ),
    "language": "语言",
    "tab_single": "单张图片",
    "tab_batch": "多张图片",
    "editor": "图片（涂抹需要保护的区域）",
    "editor_hint": "先上传图片，再用画笔涂抹需要保护的区域。涂抹过的像素会被保护；如果什么都不涂，则保护整张图片。",
    "files": "图片",
    "files_hint": "可一次上传多张图片；每张图片都整体保护（不使用蒙版）。",
    "advanced": "高级选项",
    "strength": "强度（epsilon）",
    "strength_info": "每个像素最多改变的色阶数（满分 255）。数值越大保护越强，但改动也越明显。",
    "steps": "迭代步数",
    "steps_info": "攻击的迭代次数。步数越多保护效果越好，耗时也越长。",
    "size": "输出尺寸",
    "size_info": "图片会缩放成此边长的正方形（不缩放模式下为短边长度）。",
    "mode": "模式",
    "mode_info": "纹理：把图片拉向目标图案；语义：干扰扩散模型的去噪；融合：两者兼顾。",
    "mode_textural": "纹理",
    "mode_semantic": "语义",
    "mode_fused": "融合",
    "fused_weight": "融合权重",
    "fused_weight_info": "仅用于融合模式：语义损失的权重为 10^(w+3)。",
    "low_vram": "低显存模式",
    "low_vram_info": "把图片分成 2 x 2 块分别处理，显存占用大大减少（即原版的 block_num 2）。",
    "no_resize": "不缩放模式",
    "no_resize_info": "保持宽高比：短边缩放到输出尺寸，各边向下取整为 8 的倍数（低显存模式下为 16）。",
    "seed": "随机种子",
    "seed_info": "种子和参数都相同时，输出也完全相同。",
    "precision": "计算精度",
    "precision_info": (
        "网络的运算精度（损失始终为 32 位）。auto：在支持的硬件上用 bf16，否则用 fp32；fp16 需要 CUDA 显卡。"
    ),
    "fast": "快速模式（另一种更快的方法）",
    "fast_info": "用分数蒸馏近似计算语义梯度（Xue 等，ICLR 2024）：速度约快一倍，但不是 Mist 的原始精确方法。",
    "run": "开始保护",
    "cancel": "取消",
    "original": "原图（处理尺寸）",
    "protected": "保护后",
    "perturbation": "扰动（放大显示）",
    "gallery": "已保护的图片（点击可对比）",
    "downloads": "下载（PNG 的元数据中记录了参数；多张图片另有 ZIP 压缩包）",
    "waiting": "已提交。任务按顺序逐个运行；页面会先显示排队位置，然后显示进度。",
    "loading_model": "正在加载模型（仅第一次任务需要）……",
    "progress": "第 {image}/{images} 张图片，第 {step}/{steps} 步，预计还需 {eta}",
    "preparing": "第 {image}/{images} 张图片：准备中",
    "done": "完成：{images} 张图片中的 {done} 张已保护，用时 {time}。",
    "cancel_requested": "将在当前步骤结束后取消……",
    "cancelled": "已取消。取消前完成的 {done} 张图片见下方。",
    "no_input": "请先上传图片。",
    "no_model": "没有找到 Stable Diffusion 模型，暂时无法进行保护。获取模型的方法：",
    "model_failed": "无法加载模型：",
    "invalid_settings": "参数无效：",
    "no_protection": "警告：本服务器运行的是随机权重的测试模型，生成的图片没有任何保护效果（PNG 元数据中也会注明）。",
    "too_large": "{name}：文件大小为 {size} MB，超过了本服务器 {limit} MB 的上限。",
    "bad_file": "已跳过 {name}：{problem}",
    "failed": "{name} 处理失败：{problem}",
    "out_of_memory": "内存不足：请尝试低显存模式或更小的输出尺寸",
    "nothing_done": "没有图片被保护。",
    "duration_s": "{s} 秒",
    "duration_m": "{m} 分 {s} 秒",
    "duration_h": "{h} 小时 {m} 分",
}

TEXTS: dict[str, dict[str, str]] = {"en": EN, "zh": ZH}

LABEL_KEYS: frozenset[str] = frozenset(list(EN)[: list(EN).index("downloads") + 1])
"""Keys rendered through gradio's i18n (labels, help texts, headings)."""

# Browser locales that get the Chinese strings (gradio looks up the full locale, then its language part).
CHINESE_LOCALES = ("zh", "zh-CN", "zh-SG", "zh-TW", "zh-HK", "zh-MO", "zh-Hans", "zh-Hant")


def text(lang: str, key: str, **fields: object) -> str:
    """The string `key` in `lang` (English for an unknown language), formatted with `fields`."""
    template = TEXTS.get(lang, EN)[key]
    return template.format(**fields) if fields else template


def detect_language(accept_language: str | None) -> str:
    """"zh" or "en" from an HTTP Accept-Language header: the supported language the browser prefers most."""
    best, best_q = "en", -1.0
    for part in (accept_language or "").split(","):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        language = tag.strip().lower().split("-")[0]
        if language in TEXTS and q > best_q:
            best, best_q = language, q
    return best


def duration(seconds: float, lang: str) -> str:
    """A duration for people: "42 s", "3 min 5 s", "1 h 20 min" (or the Chinese forms)."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return text(lang, "duration_s", s=seconds)
    if seconds < 3600:
        return text(lang, "duration_m", m=seconds // 60, s=seconds % 60)
    return text(lang, "duration_h", h=seconds // 3600, m=seconds % 3600 // 60)
