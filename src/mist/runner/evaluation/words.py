"""The words of an evaluation's answers and report, in English and in Chinese: the verdict per image, the answer per
mimicry, the verdict rule, the report's headings and column names, and the human names of purifications and
mimicries. The numbers and field names in results.json / results.csv stay as they are, in English."""

from __future__ import annotations

LANGUAGES = ("en", "zh")

TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "title": "Mist evaluation",
        "other_language": "中文",
        "random_weights": "This model has random weights (a test model): every number below is meaningless for "
                          "protection. Use a real Stable Diffusion v1 checkpoint to judge it.",
        "setup": "Model <b>{model}</b>; scored with method <b>{method}</b>; {images} image(s); img2img: DDIM {steps} "
                 "steps, guidance {guidance}, prompt &ldquo;{prompt}&rdquo;, seed {seed}; Mist {version}; {seconds} s.",
        "verdict_rule_heading": "Verdict rule:",
        "target_pull_note": "Target pull: 0 = the protected image's mimicry is as far from the target pattern as the "
                            "clean image's, 1 = as close as the target pattern's own mimicry.",
        "answer": "The answer",
        "not_run": "Not run",
        "plots": "Plots",
        "plots_note": "",
        "worst_heading": "Worst case over purifications",
        "worst_note": "For each image and mimicry, the purification after which the mimicry of the protected image "
                      "came closest to that of the original.",
        "all_scores": "Every score of this image",
        "raw_note": "Every number, the method's losses and the distances to the target included, is in results.csv "
                    "and results.json.",
        "set_heading": "Over the whole set",
        "set_note": "How the set of protected images' mimicries differs from the clean one's, and how natural each set "
                    "looks (no-reference quality).",
        "clip_tower": " CLIP tower: {tower}.",
        "image": "Image", "purification": "Purification", "mimicry": "Mimicry", "yes": "yes", "no": "no",
        "clean": "clean", "protected": "protected",
        "matched": "{original} &rarr; {protected} (matched by {matched_by}, evaluated at {width} x {height})",
        # the answer per mimicry (scores.Headline)
        "after_worst": "after the strongest purifier tried ({purifier})",
        "holds": "the protection holds: mimicry of these images is disrupted beyond its own randomness",
        "broken": "the protection is broken: the mimicry works as on the originals",
        "unclear": "unclear: the protection's effect is within the mimicry's own randomness",
        "headline": "{mimicry}, {after}: {answer} (effect {effect}{interval}; {held} of {images} image(s) held)",
        # the verdict per image (scores.verdict)
        "identical": "no change: the protected image equals the original",
        "not_measured": "not measured",
        "survived": "protection survived every purification and mimicry (weakest: {where}, SSIM {ssim}{references})",
        "broken_by": "protection broken by {where} (SSIM {ssim}{references}){more}",
        "more_broken": "; {count} more case(s) broken",
        "where": "{purification} at {mimicry}",
        "strength": "strength {strength}",
        "references": "; references: {references}",
        "seed_to_seed": "seed-to-seed", "random_noise": "random noise",
        # the verdict rule
        "fixed_bound": ", and below the fixed bound {bound} (--ssim-threshold)",
        "rule": "The protection holds for an image, purification and mimicry when the SSIM between the mimicry outputs "
                "of the protected and of the clean image (same purification, same seed) is below two references "
                "measured on the same image in this run: the SSIM between two mimicries of the clean image with "
                "different seeds (the mimicry's own randomness), and the SSIM between the mimicries of the clean image "
                "and of the clean image plus random noise as large as the protection (same seed){fixed}. Effect = the "
                "first reference minus the SSIM: above 0, the protection changes the mimicry more than chance does. "
                "The headline takes, per image, the purification that left the least effect, and gives the mean "
                "effect over images with a {confidence} bootstrap interval ({draws} resamplings of the images): it "
                "holds where the interval lies above 0 and most images held, is broken where it lies below 0, and is "
                "unclear otherwise. Each image was mimicked with one pair of seeds, so the interval covers the images, "
                "not more seeds.",
        # score table columns (report.PAGE_COLUMNS), whole-set columns (report.SET_COLUMNS), invisibility
        "col_holds": "Protection holds?",
        "col_ssim": "Likeness of the two mimicries (SSIM, 1 = same)",
        "col_floor_ssim": "Likeness of two mimicries of the original (other seed)",
        "col_control_ssim": "Likeness after random noise of the same size",
        "col_effect": "Effect beyond chance (above 0: protects)",
        "col_rmse_levels": "Pixel difference of the two mimicries (0-255)",
        "col_target_pull": "Pull toward the target pattern (0 none, 1 full)",
        "col_clip_similarity": "CLIP likeness of the two mimicries (1 = same)",
        "set_cmmd": "CMMD, clean vs protected mimicries (x1000, 0 = alike)",
        "set_brisque_clean": "BRISQUE of clean mimicries (higher: worse)",
        "set_brisque_protected": "BRISQUE of protected mimicries",
        "set_niqe_clean": "NIQE of clean mimicries (higher: worse)",
        "set_niqe_protected": "NIQE of protected mimicries",
        "set_clip_iqa_clean": "CLIP-IQA of clean mimicries (1: good photo)",
        "set_clip_iqa_protected": "CLIP-IQA of protected mimicries",
        "inv_psnr_db": "PSNR (dB, higher: less visible)", "inv_ssim": "SSIM with the original (1 = same)",
        "inv_ms_ssim": "MS-SSIM with the original (1 = same)", "inv_vif": "VIF: information kept (1 = all)",
        "inv_linf_levels": "Largest pixel change (0-255)", "inv_l2_levels": "Overall change (L2, 0-255)",
        "inv_lpips": "LPIPS (0 = same)",
        # the page of `mist compare` (runner/evaluation/comparison.py)
        "cmp_title": "Methods and budgets side by side",
        "cmp_intro": "Each method protected your images at each budget (the largest change of a pixel, 0-255), and "
                     "each protected set was evaluated as <code>mist evaluate</code> does. <b>Effect</b>: how much "
                     "more the mimicry of the protected images differs from that of the originals than two mimicries "
                     "of the originals differ from each other, after the strongest purifier tried (above 0: the "
                     "protection works beyond chance; the interval is a 95% bootstrap over your images). Higher PSNR "
                     "and SSIM: less visible. Each row links to its full report.",
        "cmp_method": "Method", "cmp_budget": "Budget", "cmp_worst": "Strongest purifier", "cmp_effect": "Effect",
        "cmp_interval": "Interval", "cmp_answer": "Answer",
        "decision_holds": "holds", "decision_broken": "broken", "decision_unclear": "unclear",
    },
    "zh": {
        "title": "Mist 保护效果评估",
        "other_language": "English",
        "random_weights": "此模型为随机权重（测试模型）：下面的所有数字都不"
                          "能说明保护效果。请用真实的 Stable Diffusion v1 "
                          "模型来判断。",
        "setup": "模型 <b>{model}</b>；以方法 <b>{method}</b> 计分；{images} 张图片；图生图：DDIM {steps} 步，引导系数 "
                 "{guidance}，提示词&ldquo;{prompt}&rdquo;，随机种子 {seed}；Mist {version}；用时 {seconds} 秒。",
        "verdict_rule_heading": "判定规则：",
        "target_pull_note": "目标牵引：0 表示受保护图片的模仿结果与目标图案的距离和"
                            "原图的一样远，1 表示和目标图案自身的模仿结果一样近。",
        "answer": "结论",
        "not_run": "未运行的项目",
        "plots": "图表",
        "plots_note": "（图中文字为英文。左图纵轴是两次模仿结果的相似度 "
                      "SSIM，越低说明保护越有效；右图是向目标图案的牵引；"
                      "虚线是原图换随机种子模仿时的平均相似度。）",
        "worst_heading": "各种净化中的最坏情况",
        "worst_note": "对每张图片和每种模仿方式，列出使受保护图片的模仿结果最接近原图模仿结果的那种净化。",
        "all_scores": "这张图片的全部分数",
        "raw_note": "所有数字（包括方法的损失值和到目标图案的距离）都在 results.csv 和 results.json 中。",
        "set_heading": "整组图片",
        "set_note": "受保护图片的模仿结果作为一个整体与原图的模仿结果相差多少，以及每组看起来有多自然（无参考画质）。",
        "clip_tower": " CLIP 模型：{tower}。",
        "image": "图片", "purification": "净化", "mimicry": "模仿方式", "yes": "是", "no": "否",
        "clean": "原图", "protected": "受保护",
        "matched": "{original} &rarr; {protected}（配对依据：{matched_by}，评估尺寸 {width} x {height}）",
        "after_worst": "经过所试的最强净化（{purifier}）之后",
        "holds": "保护有效：对这些图片的模仿被打乱，超出了模仿本身的随机变化",
        "broken": "保护被破解：模仿效果和对原图一样",
        "unclear": "不确定：保护的效果在模仿本身的随机变化范围之内",
        "headline": "{mimicry}，{after}：{answer}（效果 {effect}{interval}；{images} 张中 {held} 张保护有效）",
        "identical": "没有变化：受保护图片与原图相同",
        "not_measured": "未测量",
        "survived": "保护经受住了所有净化和模仿（最弱的情况：{where}，SSIM {ssim}{references}）",
        "broken_by": "保护被 {where} 破解（SSIM {ssim}{references}）{more}",
        "more_broken": "；另有 {count} 种情况被破解",
        "where": "{purification}，{mimicry}",
        "strength": "强度 {strength}",
        "references": "；参照：{references}",
        "seed_to_seed": "换随机种子", "random_noise": "随机噪声",
        "fixed_bound": "，并且低于固定界限 {bound}（--ssim-threshold）",
        "rule": "对一张图片、一种净化和一种模仿方式，当受保护图片与原图的模仿结果（相同净化、相同随机种子）之间的 SSIM "
                "低于本次运行中在同一张图片上测得的两个参照值时，判定保护有效：一是原图用不同随机种子模仿两次的 SSIM"
                "（模仿本身的随机性），二是原图与“原图加上和保护同样"
                "大小的随机噪声”的模仿结果之间的 SSIM（相同随机种子）"
                "{fixed}。效果 = 第一个参照值减去 SSIM：大于 0 说明保护"
                "对模仿的改变超过了随机因素。结论对每张图片取留下效果"
                "最少的净化，给出各图片效果的平均值及其 {confidence} 自"
                "助法区间（对图片重抽样 {draws} 次）：区间整体大于 0 "
                "且多数图片保护有效时判为有效，整体小于 0 时判为被破解，其余为不确定。每张图片只用一对随机种子模仿，"
                "所以区间反映的是图片之间的差异，而不是更多随机种子。",
        "col_holds": "保护有效？",
        "col_ssim": "两次模仿结果的相似度（SSIM，1 = 相同）",
        "col_floor_ssim": "原图两次模仿的相似度（换随机种子）",
        "col_control_ssim": "加同样大小随机噪声后的相似度",
        "col_effect": "超出随机的效果（大于 0：有保护作用）",
        "col_rmse_levels": "两次模仿结果的像素差（0-255）",
        "col_target_pull": "向目标图案的牵引（0 无，1 完全）",
        "col_clip_similarity": "两次模仿结果的 CLIP 相似度（1 = 相同）",
        "set_cmmd": "CMMD，原图与受保护图片的模仿结果（x1000，0 = 相同）",
        "set_brisque_clean": "原图模仿结果的 BRISQUE（越高越差）",
        "set_brisque_protected": "受保护图片模仿结果的 BRISQUE",
        "set_niqe_clean": "原图模仿结果的 NIQE（越高越差）",
        "set_niqe_protected": "受保护图片模仿结果的 NIQE",
        "set_clip_iqa_clean": "原图模仿结果的 CLIP-IQA（1：好照片）",
        "set_clip_iqa_protected": "受保护图片模仿结果的 CLIP-IQA",
        "inv_psnr_db": "PSNR（dB，越高越不明显）", "inv_ssim": "与原图的 SSIM（1 = 相同）",
        "inv_ms_ssim": "与原图的 MS-SSIM（1 = 相同）", "inv_vif": "VIF：保留的信息（1 = 全部）",
        "inv_linf_levels": "最大像素改动（0-255）", "inv_l2_levels": "总改动（L2，0-255）",
        "inv_lpips": "LPIPS（0 = 相同）",
        "cmp_title": "各方法与强度对比",
        "cmp_intro": "每种方法都以每个强度（像素的最大改动，0-255）保护了你的图片，每组受保护图片都像 "
                     "<code>mist evaluate</code> 那样做了评估。<b>效果</b>：经过所试的最强净化后，"
                     "受保护图片的模仿结果与原图的模仿结果之差，比原图两次模仿之间的差别多出多少（大于 0："
                     "保护的作用超出随机因素；区间是对你的图片做的 95% 自助法区间）。PSNR 和 SSIM 越高："
                     "越不明显。每一行都链接到它的完整报告。",
        "cmp_method": "方法", "cmp_budget": "强度", "cmp_worst": "最强净化", "cmp_effect": "效果",
        "cmp_interval": "区间", "cmp_answer": "结论",
        "decision_holds": "有效", "decision_broken": "被破解", "decision_unclear": "不确定",
    },
}

# Purifications' names in Chinese, by kind, with {value} as in `purify.KINDS`' English labels.
PURIFICATIONS_ZH = {
    "none": "不净化", "jpeg": "JPEG 压缩 q{value}", "resize": "缩小到 {value} 倍再放大",
    "jpeg-resize": "JPEG q{value} + 缩小 0.5 倍", "blur": "高斯模糊 {value} 像素", "noise": "高斯噪声 {value}/255",
    "crop": "裁剪 {value} 再放大", "adverse": "AdverseCleaner（{value} 次双边滤波）", "sdedit": "SDEdit {value}",
    "vae": "VAE 往返 x{value}", "impress": "IMPRESS（{value} 步）", "upscale": "加噪（σ {value}）后 x4 超分",
    "gridpure": "GrIDPure 分块 SDEdit {value}",
}


def word(lang: str, key: str, **values: object) -> str:
    """The text `key` in `lang` ("en" or "zh"; English where the Chinese is missing), formatted with `values`."""
    table = TEXTS.get(lang, TEXTS["en"])
    template = table.get(key, TEXTS["en"][key])
    return template.format(**values) if values else template


def purification_label(kind: str, value: float | None, english: str, lang: str) -> str:
    """A purification's human name in `lang`: its Chinese name where there is one, else the English `english`."""
    template = PURIFICATIONS_ZH.get(kind) if lang == "zh" else None
    if template is None:
        return english
    return template.format(value="" if value is None else f"{value:g}")


def mimicry_label(name: str, english: str, lang: str) -> str:
    """A mimicry's human name in `lang`: img2img is 图生图 in Chinese, textual inversion 文本反演 (its English label
    in brackets, with its steps); others keep their English names."""
    if lang == "zh" and name.startswith("img2img:"):
        return f"图生图 强度 {name.partition(':')[2]}"
    if lang == "zh" and name == "ti":
        return f"文本反演（{english}）"
    return english
