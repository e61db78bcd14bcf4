"""Every string the web UI shows, in English and in Simplified Chinese.

`EN` and `ZH` have the same keys. Keys in `LABEL_KEYS` are labels and help texts rendered by the browser through
gradio's i18n (ICU message syntax, so they hold no braces); the other keys are messages formatted here with
`str.format` fields. Engine errors (a file's problem, the model search) stay in English and are quoted as they are.
`GRADIO_ZH` translates the few strings of gradio's own page that its Chinese table lacks.
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
        "the region to protect, and press **Protect**. Everything runs on this computer: your images go nowhere else, "
        "and the uploaded original is deleted when its job ends (a copy for the Evaluate tab, when the check ran or "
        "the page is closed)."
    ),
    "intro_served": (
        "Mist adds a small, hard-to-see perturbation to an image so that AI models trained on it or editing it "
        "(img2img, textual inversion, DreamBooth, LoRA) produce scrambled results. Upload an image, optionally paint "
        "the region to protect, and press **Protect**. Your images are sent to the computer that serves this page and "
        "processed there; the uploaded original is deleted from it when its job ends (a copy for the Evaluate tab, "
        "when the check ran or the page is closed)."
    ),
    "language": "Language",
    "tab_single": "One image",
    "tab_batch": "Several images",
    "artwork": "1. Your artwork",
    "editor": "2. Paint to protect (optional)",
    "editor_hint": (
        "Choose your artwork above; a preview appears here. Paint with the brush over the region to protect: painted "
        "pixels are protected; with nothing painted, the whole image is protected."
    ),
    "files": "Images",
    "files_hint": "Upload several images at once; each one is protected everywhere (no mask).",
    "advanced": "Advanced",
    "strength": "Strength",
    "strength_info": "Largest change of a pixel, in levels out of 255. Higher protects more but is more visible.",
    "steps": "Steps",
    "steps_info": "Attack iterations. More steps protect better and take longer.",
    "original_size": "Keep the artwork's own size (recommended)",
    "original_size_info": (
        "The protected image has your artwork's width, height and shape. Off: it is the square of the processing size "
        "below, as the original Mist made it."
    ),
    "size": "Processing size",
    "size_info": (
        "Mist works on the image at this size (a square, or the shorter side with aspect kept). Larger is slower."
    ),
    "method": "Method",
    "method_info": "How the protection is computed. Mist v1.2 is the default; the others are its successors and "
                   "rivals.",
    "low_vram": "Use less GPU memory (low-VRAM mode)",
    "low_vram_info": "Protect the image as 2 x 2 tiles: much less GPU memory (the original's block_num 2).",
    "no_resize": "Keep the aspect while processing (no-resize mode)",
    "no_resize_info": (
        "The shorter side goes to the processing size, each side down to a multiple of 8 (16 in low-VRAM mode)."
    ),
    "robust": "Robust to JPEG and resizing",
    "robust_info": (
        "At every step the protection is computed through a random JPEG, resize or blur of the image, so that more "
        "of it survives when the image is recompressed or resized (the command line's --robust)."
    ),
    "seed": "Random seed",
    "seed_info": "Same seed and settings, same output.",
    "precision": "Arithmetic precision",
    "precision_info": (
        "Network arithmetic (losses stay 32-bit). auto: bf16 where it is fast, else fp32; fp16 needs a CUDA GPU."
    ),
    "run": "Protect",
    "cancel": "Cancel",
    "original": "Original (as processed)",
    "protected": "Protected",
    "perturbation": "Perturbation (amplified)",
    "gallery": "Protected images (click one to compare)",
    "tab_evaluate": "Evaluate",
    "evaluate_intro": (
        "Does the protection hold? After a job, this runs img2img (what a mimic does) on each original and on its "
        "protected image with the same seed and compares the two results. The page keeps a copy of the last job's "
        "originals for this until the check ran, the next job starts or the page is closed."
    ),
    "evaluate_strength": "img2img strength",
    "evaluate_jpeg": "Also after JPEG q75 (a mimic's first purification)",
    "evaluate_run": "Evaluate the last job",
    "evaluate_grid": "Original | protected | img2img of the original | img2img of the protected image",
    "downloads": "Downloads (PNG with settings in its metadata; ZIP for several)",
    # --- messages (str.format) ---
    "waiting": "Waiting: {ahead} job(s) of other pages run first (one at a time), then this one starts.",
    "starting": "Starting...",
    "busy": "This page already has a job running; cancel it or wait for it to finish.",
    "warning": "Warning",
    "unusable": "{name} cannot be protected: {problem}",
    "uploads_removed": ("The uploaded original was deleted from the server; upload it again to protect it once more. "
                        "The views shown here go with the next job or when the page is closed."),
    "loading_model": "Loading the model (only on the first job)...",
    "progress": "Image {image} of {images}, step {step} of {steps}, about {eta} left",
    "preparing": "Image {image} of {images}: preparing",
    "done": "Done: {done} of {images} image(s) protected in {time}.",
    "cancel_requested": "Cancelling after the current step...",
    "reload_running": "Found this page's job again after the reload: it goes on. {latest}",
    "reload_found": "This page's last job, found again after the reload:",
    "reload_dropped": ("The page was reloaded before its job started, so that job was not run: upload the image again "
                       "and press Protect."),
    "reload_evaluate": ("The page was reloaded during the evaluation, which was stopped. The originals are kept: you "
                        "can run it again."),
    "cancelled": "Cancelled. {done} image(s) finished before the cancel are below.",
    "no_input": "Upload an image first.",
    "no_model": "No Stable Diffusion model was found, so nothing can be protected yet. How to get one:",
    "model_failed": "The model could not be loaded:",
    "method_refused": ("This server's model cannot run the chosen method; choose PhotoGuard, PID or Mist with the "
                       "textural mode:"),
    "invalid_settings": "Invalid settings:",
    "not_offered": "Not offered, as this server's model cannot run them: {methods}.",
    "no_protection": (
        "WARNING: this server runs a random-weight test model: the images it makes have NO protection (their PNG "
        "metadata says so too)."
    ),
    "too_large": "the file is {size} MB, above this server's limit of {limit} MB",
    "bad_file": "Skipped {name}: {problem}",
    "failed": "{name} failed: {problem}",
    "out_of_memory": "out of memory: try Low-VRAM mode or a smaller output size",
    "nothing_done": "No image was protected.",
    "duration_s": "{s} s",
    "duration_m": "{m} min {s} s",
    "duration_h": "{h} h {m} min",
    "originals_kept": "A copy stays for the Evaluate tab until the check ran, the next job starts or the page closes.",
    "evaluate_nothing": "Protect an image first: the check runs on the page's last finished job.",
    "evaluate_progress": "Evaluating: {doing} ({done} of {total})",
    "evaluate_left": ", about {eta} left",
    "evaluate_failed": "The evaluation could not run:",
    "evaluate_cancelled": "Evaluation cancelled. The originals are kept: you can run it again.",
    "evaluate_done": "Checked {images} image(s) in {time} (SSIM of the two img2img results: 1 means identical; the "
                     "protection holds where it is lower than between two img2img results of the original with "
                     "different seeds, and than after random noise as large as the protection).",
    "evaluate_removed": "The copy of the originals was deleted from the server; protect again to evaluate once more.",
    "col_clean": "original",
    "col_protected": "protected",
    "col_mimic_clean": "img2img of the original",
    "col_mimic_protected": "img2img of the protected image, SSIM {ssim}",
    "col_purified": "protected after {purification}",
    "col_mimic_purified": "img2img after {purification}, SSIM {ssim}",
}

ZH: dict[str, str] = {
    "title": "Mist：保护艺术作品免受 AI 模仿",
    "heading": "## Mist：保护艺术作品免受 AI 模仿",
    "intro": (
        "Mist 会在图片上加入细微、难以察觉的扰动，使基于它训练或对它进行编辑的 AI 模型（img2img、文本反演、"
        "DreamBooth、LoRA）只能得到混乱的结果。上传图片，（可选）涂抹需要保护的区域，然后点击**开始保护**。"
        "所有计算都在本机完成：图片不会被发送到其他地方，上传的原图在任务结束后即被删除（供效果检验用的副本在检验完成或页面关闭后删除）。"
    ),
    "intro_served": (
        "Mist 会在图片上加入细微、难以察觉的扰动，使基于它训练或对它进行编辑的 AI 模型（img2img、文本反演、"
        "DreamBooth、LoRA）只能得到混乱的结果。上传图片，（可选）涂抹需要保护的区域，然后点击**开始保护**。"
        "图片会被发送到提供本页面的计算机上处理；任务结束后，上传的原图即从该计算机上删除（供效果检验用的副本在检验完成或页面关闭后删除）。"
    ),
    "language": "语言",
    "tab_single": "单张图片",
    "tab_batch": "多张图片",
    "artwork": "1. 你的作品",
    "editor": "2. 涂抹保护区域（可选）",
    "editor_hint": ("先在上方选择作品，这里会显示预览。用画笔涂抹需要保护的区域：涂抹过的像素会被保护；"
                    "如果什么都不涂，则保护整张图片。"),
    "files": "图片",
    "files_hint": "可一次上传多张图片；每张图片都整体保护（不使用蒙版）。",
    "advanced": "高级选项",
    "strength": "强度",
    "strength_info": "每个像素最多改变的色阶数（满分 255）。数值越大保护越强，但改动也越明显。",
    "steps": "迭代步数",
    "steps_info": "攻击的迭代次数。步数越多保护效果越好，耗时也越长。",
    "original_size": "保持作品原尺寸（推荐）",
    "original_size_info": "保护后的图片与作品的宽、高和比例相同。关闭时输出为下方处理尺寸的正方形，与原版 Mist 相同。",
    "size": "处理尺寸",
    "size_info": "Mist 在此尺寸下处理图片（正方形，或保持比例时的短边长度）。尺寸越大越慢。",
    "method": "方法",
    "method_info": "保护的计算方式。默认为 Mist v1.2，其余为其后继与同类方法。",
    "low_vram": "减少显存占用（低显存模式）",
    "low_vram_info": "把图片分成 2 x 2 块分别处理，显存占用大大减少（即原版的 block_num 2）。",
    "no_resize": "处理时保持比例（不缩放模式）",
    "no_resize_info": "短边缩放到处理尺寸，各边向下取整为 8 的倍数（低显存模式下为 16）。",
    "robust": "抗 JPEG 压缩与缩放",
    "robust_info": ("每一步都通过对图片随机 JPEG 压缩、缩放或模糊后再计算保护，"
                    "使图片被重新压缩或缩放后保护保留得更多（即命令行的 --robust）。"),
    "seed": "随机种子",
    "seed_info": "种子和参数都相同时，输出也完全相同。",
    "precision": "运算精度",
    "precision_info": (
        "网络的运算精度（损失始终为 32 位）。auto：在支持的硬件上用 bf16，否则用 fp32；fp16 需要 CUDA 显卡。"
    ),
    "run": "开始保护",
    "cancel": "取消",
    "original": "原图（处理尺寸）",
    "protected": "保护后",
    "perturbation": "扰动（放大显示）",
    "gallery": "已保护的图片（点击可对比）",
    "tab_evaluate": "效果检验",
    "evaluate_intro": (
        "保护是否有效？任务完成后，这里用相同的随机种子分别对每张原图和保护后的图片运行 img2img（模仿者的做法），"
        "并比较两个结果。为此，本页面会保留上一个任务原图的副本，直到检验运行完、下一个任务开始或页面被关闭。"
    ),
    "evaluate_strength": "img2img 强度",
    "evaluate_jpeg": "同时检验 JPEG q75 压缩之后（模仿者最常用的净化手段）",
    "evaluate_run": "检验上一个任务",
    "evaluate_grid": "原图 | 保护后 | 原图的 img2img | 保护后图片的 img2img",
    "downloads": "下载（PNG 的元数据中记录了参数；多张图片另有 ZIP 压缩包）",
    "waiting": "排队中：先运行其他页面的 {ahead} 个任务（逐个运行），然后开始本任务。",
    "starting": "正在开始……",
    "busy": "本页面已有任务在运行；请取消它或等待它完成。",
    "warning": "警告",
    "unusable": "{name} 无法保护：{problem}",
    "uploads_removed": ("上传的原图已从服务器删除；如需再次保护，请重新上传。"
                        "这里显示的预览会在下一个任务开始或页面关闭时删除。"),
    "loading_model": "正在加载模型（仅第一次任务需要）……",
    "progress": "第 {image}/{images} 张图片，第 {step}/{steps} 步，预计还需 {eta}",
    "preparing": "第 {image}/{images} 张图片：准备中",
    "done": "完成：{images} 张图片中的 {done} 张已保护，用时 {time}。",
    "cancel_requested": "将在当前步骤结束后取消……",
    "reload_running": "刷新后找回了本页面的任务，它仍在继续。{latest}",
    "reload_found": "刷新后找回了本页面上一个任务的结果：",
    "reload_dropped": "页面在任务开始之前被刷新，该任务没有运行：请重新上传图片并点击“开始保护”。",
    "reload_evaluate": "页面在检验过程中被刷新，检验已停止。原图仍保留，可以重新检验。",
    "cancelled": "已取消。取消前完成的 {done} 张图片见下方。",
    "no_input": "请先上传图片。",
    "no_model": "没有找到 Stable Diffusion 模型，暂时无法进行保护。获取模型的方法：",
    "model_failed": "无法加载模型：",
    "method_refused": "本服务器的模型无法运行所选方法，请改选 PhotoGuard、PID 或纹理模式的 Mist：",
    "invalid_settings": "参数无效：",
    "not_offered": "本服务器的模型无法运行以下方法，因此未列出：{methods}。",
    "no_protection": "警告：本服务器运行的是随机权重的测试模型，生成的图片没有任何保护效果（PNG 元数据中也会注明）。",
    "too_large": "文件大小为 {size} MB，超过了本服务器 {limit} MB 的上限",
    "bad_file": "已跳过 {name}：{problem}",
    "failed": "{name} 处理失败：{problem}",
    "out_of_memory": "内存不足：请尝试低显存模式或更小的输出尺寸",
    "nothing_done": "没有图片被保护。",
    "duration_s": "{s} 秒",
    "duration_m": "{m} 分 {s} 秒",
    "duration_h": "{h} 小时 {m} 分",
    "originals_kept": "供效果检验用的副本会保留到检验完成、下一个任务开始或页面关闭为止。",
    "evaluate_nothing": "请先保护一张图片：检验针对本页面上一个已完成的任务。",
    "evaluate_progress": "检验中：{doing}（{done}/{total}）",
    "evaluate_left": "，预计还需 {eta}",
    "evaluate_failed": "无法进行检验：",
    "evaluate_cancelled": "检验已取消。原图仍保留，可以重新检验。",
    "evaluate_done": "已检验 {images} 张图片，用时 {time}（两个 img2img 结果的 SSIM：1 表示完全相同；"
                     "低于原图用不同随机种子的两次 img2img 结果之间的 SSIM，且低于加入同等大小随机噪声后的 SSIM，"
                     "表示保护有效）。",
    "evaluate_removed": "原图副本已从服务器删除；如需再次检验，请重新保护。",
    "col_clean": "原图",
    "col_protected": "保护后",
    "col_mimic_clean": "原图的 img2img",
    "col_mimic_protected": "保护后图片的 img2img，SSIM {ssim}",
    "col_purified": "{purification} 之后的保护图片",
    "col_mimic_purified": "{purification} 之后的 img2img，SSIM {ssim}",
}

TEXTS: dict[str, dict[str, str]] = {"en": EN, "zh": ZH}

GRADIO_ZH: dict[str, str] = {
    "common.complete": "完成",  # read to screen readers when an event ends; missing from gradio's Chinese table
}
"""gradio's own keys that its Chinese table lacks (without them a screen reader reads the raw key)."""

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


# The Chinese names and help of the built-in methods and their parameters, by the keys `app.method_labels` gives them
# (`method_<name>`, `param_<name>`, `param_<name>_info`, `param_<name>_<choice>`); the English ones are the methods'
# own declarations. A method without an entry here (a plug-in's) shows its English texts.
METHODS_ZH: dict[str, str] = {
    "param_mode": "模式",
    "param_mode_info": "纹理：把图片拉向目标图案；语义：干扰扩散模型的去噪；融合：两者兼顾",
    "param_mode_textural": "纹理",
    "param_mode_semantic": "语义",
    "param_mode_fused": "融合",
    "param_fused_weight": "两种方法的平衡（融合权重）",
    "param_fused_weight_info": "仅用于融合模式：数值越大，语义部分的权重越高（为 10^(w+3) 倍）",
    "param_fast": "快速模式（另一种更快的方法）",
    "param_fast_info": "用分数蒸馏近似计算语义梯度（Xue 等，ICLR 2024）：约快一倍，但不是 Mist 的原始精确方法",
    "param_object_prompt": "图片内容是物体（而非画风）",
    "param_object_prompt_info": "图片内容是物体：用“a photo”代替“a painting”作为提示词",
    "method_photoguard": "PhotoGuard（编码器攻击）",
    "param_zero_target": "以零潜变量为目标",
    "param_zero_target_info": "未给目标图像时：把编码推向零潜变量（PhotoGuard 的 img2img 示例），而不是纯灰图像的编码",
    "method_sds": "分数蒸馏（SDS）",
    "param_sign": "符号",
    "param_sign_info": "-：降低去噪损失（SDS-，论文中最强）；+：提高去噪损失（SDS+）",
    "param_textural": "纹理目标（SDST）",
    "param_textural_info": "同时把图片的潜变量拉向目标图案（SDST）",
    "param_sds_weight": "SDS 权重",
    "param_sds_weight_info": "仅用于 SDST：SDS 梯度相对纹理梯度的倍数（Diff-Protect 的 target_rate）",
    "method_mist2": "Mist-v2（目标 UNet）",
    "param_fused": "融合（Mist-v2）",
    "param_fused_info": "Mist-v2 的融合模式：降低噪声预测与真实噪声的一致性，并增大潜变量与目标的距离，"
                        "代替目标 UNet 损失",
    "param_latent_weight": "潜变量权重",
    "param_latent_weight_info": "仅用于融合模式：潜变量距离项的权重（Mist-v2 为 100）",
    "method_pid": "PID（与提示词无关）",
    "param_pid_loss": "PID 损失",
    "param_pid_loss_info": "PID 使哪些量远离干净图像的后验：add-log 为均值与对数方差（论文的选择）；"
                           "add 为均值与标准差；mean 仅均值；var 仅标准差",
    "method_aspl": "Anti-DreamBooth（ASPL）",
    "param_surrogate": "代理模型",
    "param_surrogate_info": "代理模型微调的部分：LoRA 适配器，或整个 UNet（SD v1 上多用约 17 GB 内存）",
    "param_surrogate_lora": "LoRA 适配器",
    "param_surrogate_full": "整个 UNet",
    "param_round_steps": "每轮步数",
    "param_round_steps_info": "每轮的 PGD 步数，两次代理模型微调之间（Anti-DreamBooth's LoRA code：10）",
    "param_surrogate_steps": "代理微调步数",
    "param_surrogate_steps_info": "每轮代理模型的微调步数；0 表示不训练（Anti-DreamBooth's LoRA code：10）",
    "param_surrogate_lr": "代理学习率",
    "param_surrogate_lr_info": "代理模型微调的学习率（Anti-DreamBooth: 5e-6 for LoRA, 5e-7 for the whole UNet）",
    "param_lora_rank": "LoRA 秩",
    "param_lora_rank_info": "代理模型 LoRA 适配器的秩（均为 4）",
    "method_mist2-lora": "Mist-v2（LoRA 代理）",
}
